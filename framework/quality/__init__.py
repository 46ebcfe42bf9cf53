"""Quality measurement: proxy fidelity benchmark and the paper's protocol."""
