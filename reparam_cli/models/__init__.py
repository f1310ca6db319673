"""Full architectures built from the block families (ResNet, MobileNet, ...), used by the specs.

An architecture that belongs to one family alone (RepVGG, MobileOne) lives in that family's file
under `reparam_cli/blocks/`; backbones shared by several families live here.
"""
