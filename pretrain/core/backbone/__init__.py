"""The backbone both stages share: ResNet building, the backbone file format, and reading other
SSL code bases' checkpoints."""
