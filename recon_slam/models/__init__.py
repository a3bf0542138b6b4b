"""Neural network models of recon_slam (sub-packages per model family)."""
