"""crossmodal: label-efficient multimodal 3D segmentation for MONAI Label."""

__version__ = "0.1.0"
