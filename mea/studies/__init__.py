"""Studies over the tools and the library: the paper's protocol (mea-experiment) and its report, the init audit (mea-init-audit), and what they share (protocol)."""
