"""The training math and the small state it needs: log-probs, preference margins and metrics,
pairwise losses, beta policies (fixed, Dynamic-Beta, Beta-DPO) with their controllers, and the
objectives that compose them. Tensors in, tensors out: no I/O, and collectives are passed in."""
