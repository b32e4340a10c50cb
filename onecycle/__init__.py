"""LR range test + 1cycle training of a custom ResNet on CIFAR-10 (Leslie Smith's recipe)."""

__version__ = "0.1.0"
