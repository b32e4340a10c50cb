"""The training core: the model and its initial weights, devices, batches and augmentation, the schedules, the loop, checkpoints and ranks."""
