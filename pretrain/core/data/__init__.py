"""Data both stages read: COCO detection sets and their cleaning, image loading, label maps,
unlabeled image folders, the built-in synthetic scenes."""
