"""The compressed ``nn.Module`` layers (built on the meta device, filled from factors)."""
