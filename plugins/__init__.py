"""First-party model adapters (SDXL UNet, Flux transformer), registered like any third-party plugin."""
