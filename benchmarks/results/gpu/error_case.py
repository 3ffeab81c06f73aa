import torch
import pka_ext
op_fwd, op_bwd = torch.ops.pka_ext.pka_fwd, torch.ops.pka_ext.pka_bwd
def inputs(d, device='cuda', dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 4, d, generator=g).to(device, dtype) for _ in range(3))
    a = (torch.eye(4) + 0.1 * torch.randn(4, 4, generator=g)).to(device, dtype)
    return q, k, v, a, a.clone()
try:
    op_fwd(*inputs(2), torch.tensor([5, 1]), 1.0, 0.0, None)
except RuntimeError as e:
    print('RAISED', str(e).splitlines()[0])
else:
    print('NO ERROR')

