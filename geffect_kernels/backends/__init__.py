"""Every implementation of the token primitive and the fused losses (DESIGN §2), behind one seam.

`interface` (the contract), `registry` (name, alias or "auto" -> backend; the one fallback decision),
`autograd` (pieces the backends share), `chunked` (the ``torch`` backend), `oracle` (plain torch, full
logits: what every other backend is tested against), `triton/` (Triton kernels), `cpp/` (loader and backend
of the C++/CUDA extension, with its sources in the repository's top-level csrc/).
"""
