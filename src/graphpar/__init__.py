"""graphpar: graph parallelism for billion-parameter GNNs on OC20 (Sriram et al., ICLR 2022)."""

__version__ = "0.1.0"
