"""Self-supervised pretraining of ResNet backbones (SwAV, VICReg, MoCo v2, SimCLR)."""
