"""cuDNN's fp8 attention, forward and backward, through the cuDNN frontend's Python graphs.

Only for `attention_speed.py --kernels cudnn-fp8`: a measurement of what attention in fp8 would
give on a Hopper card, not a kernel the engine uses. Needs `pip install nvidia-cudnn-frontend`.

On Hopper (cuDNN 9) the fp8 kernels take and give fp8 only: Q, K, V, O, dO, dQ, dK and dV are
E4M3 with one scale per tensor (a bf16 O or dQ/dK/dV is for Blackwell). The scales here:
- Q, K, V, dO: their own absolute maxima ("current" scaling), as a trainer would compute them;
- the softmax's probabilities are at most 1, so theirs is fixed at 448, E4M3's largest value;
- O is a weighted mean of V's rows, so V's maximum bounds it;
- dS (the scores' gradient) and dQ, dK, dV: the maxima the kernel reports on a first run, as a
  trainer's delayed scaling would take them from the step before.
"""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0


class CudnnFp8Attention:
    """Forward and backward fp8 attention graphs built for one (batch, heads, tokens, head size)."""

    def __init__(self, shape: tuple[int, int, int, int], device: torch.device):
        import cudnn  # noqa: PLC0415 - the package is needed by this benchmark kernel only

        self.cudnn = cudnn
        self.device = device
        self.shape = shape
        self.stride = torch.empty(shape, device="meta").stride()
        self.attn_scale = 1.0 / math.sqrt(shape[-1])
        self.handle = cudnn.create_handle()
        cudnn.set_stream(self.handle, torch.cuda.current_stream(device).cuda_stream)
        self._build_forward()
        self._build_backward()

    def _graph(self):
        fp8, fp32 = self.cudnn.data_type.FP8_E4M3, self.cudnn.data_type.FLOAT
        return self.cudnn.pygraph(io_data_type=fp8, intermediate_data_type=fp32, compute_data_type=fp32,
                                  handle=self.handle)

    def _fp8(self, graph, output=None):
        if output is None:
            return graph.tensor(dim=self.shape, stride=self.stride, data_type=self.cudnn.data_type.FP8_E4M3)
        output.set_output(True).set_dim(self.shape).set_stride(self.stride).set_data_type(
            self.cudnn.data_type.FP8_E4M3)
        return output

    def _scalar(self, graph, output=None):
        if output is None:
            return graph.tensor(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=self.cudnn.data_type.FLOAT)
        output.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(
            self.cudnn.data_type.FLOAT)
        return output

    def _stats(self, graph, output=None):
        b, h, s, _ = self.shape
        if output is None:
            return graph.tensor(dim=(b, h, s, 1), stride=(h * s, s, 1, 1), data_type=self.cudnn.data_type.FLOAT)
        output.set_output(True).set_dim((b, h, s, 1)).set_stride((h * s, s, 1, 1)).set_data_type(
            self.cudnn.data_type.FLOAT)
        return output

    def _plan(self, graph):
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([self.cudnn.heur_mode.A, self.cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        return torch.empty(graph.get_workspace_size(), device=self.device, dtype=torch.uint8)

    def _build_forward(self):
        g = self._graph()
        q, k, v = self._fp8(g), self._fp8(g), self._fp8(g)
        scales = {name: self._scalar(g) for name in ("descale_q", "descale_k", "descale_v", "descale_s",
                                                     "scale_s", "scale_o")}
        o, stats, amax_s, amax_o = g.sdpa_fp8(q=q, k=k, v=v, **scales, generate_stats=True,
                                              attn_scale=self.attn_scale, use_causal_mask=False)
        self._fp8(g, o), self._stats(g, stats), self._scalar(g, amax_s), self._scalar(g, amax_o)
        self.forward_graph, self.forward_workspace = g, self._plan(g)
        self.forward_tensors = dict(q=q, k=k, v=v, o=o, stats=stats, amax_s=amax_s, amax_o=amax_o, **scales)

    def _build_backward(self):
        g = self._graph()
        q, k, v, o, d_o = (self._fp8(g) for _ in range(5))
        stats = self._stats(g)
        names = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
                 "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")
        scales = {name: self._scalar(g) for name in names}
        dq, dk, dv, *amaxes = g.sdpa_fp8_backward(q=q, k=k, v=v, o=o, dO=d_o, stats=stats, **scales,
                                                  attn_scale=self.attn_scale, use_causal_mask=False)
        for t in (dq, dk, dv):
            self._fp8(g, t)
        for t in amaxes:
            self._scalar(g, t)
        self.backward_graph, self.backward_workspace = g, self._plan(g)
        self.backward_tensors = dict(q=q, k=k, v=v, o=o, dO=d_o, stats=stats, dQ=dq, dK=dk, dV=dv,
                                     amax_dQ=amaxes[0], amax_dK=amaxes[1], amax_dV=amaxes[2],
                                     amax_dP=amaxes[3], **scales)

    def _bind(self, tensors: dict, values: dict) -> dict:
        return {tensors[name]: value for name, value in values.items()}

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, repeats: int,
            median_ms) -> dict:
        """Forward and backward on bf16 inputs: times (kernels alone) and the real-valued results."""
        def scalar(x):
            return torch.full((1, 1, 1, 1), float(x), device=self.device, dtype=torch.float32)

        def quantize(x):
            scale = E4M3_MAX / x.abs().amax().float().clamp(min=1e-30)
            return (x.float() * scale).to(torch.float8_e4m3fn), (1.0 / scale).view(1, 1, 1, 1)

        (q8, dq_), (k8, dk_), (v8, dv_), (do8, ddo_) = (quantize(t) for t in (q, k, v, grad))
        scale_o = scalar(E4M3_MAX / float(v.abs().max()))
        o = torch.empty(self.shape, device=self.device, dtype=torch.float8_e4m3fn)
        stats = torch.empty((*self.shape[:3], 1), device=self.device, dtype=torch.float32)
        forward_pack = self._bind(self.forward_tensors, dict(
            q=q8, k=k8, v=v8, descale_q=dq_, descale_k=dk_, descale_v=dv_, descale_s=scalar(1 / E4M3_MAX),
            scale_s=scalar(E4M3_MAX), scale_o=scale_o, o=o, stats=stats, amax_s=scalar(0), amax_o=scalar(0)))

        def forward():
            self.forward_graph.execute(forward_pack, self.forward_workspace, handle=self.handle)

        forward()
        grads = [torch.empty(self.shape, device=self.device, dtype=torch.float8_e4m3fn) for _ in range(3)]
        amaxes = [scalar(0) for _ in range(4)]
        # dS's scale: an estimate that keeps it in range, then the maxima the kernel reports.
        scale = dict(dQ=1.0, dK=1.0, dV=1.0, dP=E4M3_MAX / 1e-3)
        for _ in range(3):
            backward_pack = self._bind(self.backward_tensors, dict(
                q=q8, k=k8, v=v8, o=o, dO=do8, stats=stats, descale_q=dq_, descale_k=dk_, descale_v=dv_,
                descale_o=1.0 / scale_o, descale_dO=ddo_, descale_s=scalar(1 / E4M3_MAX),
                descale_dP=scalar(1 / scale["dP"]), scale_s=scalar(E4M3_MAX), scale_dQ=scalar(scale["dQ"]),
                scale_dK=scalar(scale["dK"]), scale_dV=scalar(scale["dV"]), scale_dP=scalar(scale["dP"]),
                dQ=grads[0], dK=grads[1], dV=grads[2], amax_dQ=amaxes[0], amax_dK=amaxes[1], amax_dV=amaxes[2],
                amax_dP=amaxes[3]))
            self.backward_graph.execute(backward_pack, self.backward_workspace, handle=self.handle)
            reported = [float(a) for a in amaxes]
            scale = {name: E4M3_MAX / m if m > 0 else scale[name] * 256
                     for name, m in zip(("dQ", "dK", "dV", "dP"), reported)}

        def backward():
            self.backward_graph.execute(backward_pack, self.backward_workspace, handle=self.handle)

        forward_ms = median_ms(forward, repeats, warmup=3, gpu_only=True)
        backward_ms = median_ms(backward, repeats, warmup=3, gpu_only=True)
        quantize_ms = median_ms(lambda: [quantize(t) for t in (q, k, v, grad)], repeats, warmup=3,
                                gpu_only=True)
        # The last backward ran with the scales of the one before it; the maxima of the final run.
        used = {name: float(backward_pack[self.backward_tensors[f"scale_{name}"]]) for name in ("dQ", "dK", "dV")}
        return dict(
            out=o.float() / scale_o, grads=[g.float() / used[n] for g, n in zip(grads, ("dQ", "dK", "dV"))],
            forward_ms=forward_ms, backward_ms=backward_ms, quantize_ms=quantize_ms)
