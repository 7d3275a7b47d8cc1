"""``LearnerWorker`` setup: torch.distributed / DeepSpeed init, the model, the engine and the packing self-check.

A mixin of ``learner.py``'s worker (same ``self``), kept apart so each file reads on its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from cascade_rl.algos.packing import build_micro_batch

from .attention import VARLEN_ATTENTION, choose_attention
from .fused_kernels import (
    apply_fused_kernels,
    check_fused_kernels,
    choose_fused_kernels,
    fused_kernels_report,
)
from .learner_batches import build_ds_config, freeze_parameters

PACKED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention", VARLEN_ATTENTION)  # Σ len² cost


class LearnerSetupMixin:
    spec: Any
    rank: int
    world_size: int
    device: torch.device
    model: Any
    engine: Any
    packing_check_diff: float | None
    _pad_id: int

    # ------------------------------------------------------------------ setup

    def _init_distributed(self, master_addr: str, master_port: int) -> torch.device:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        on_cuda = get_accelerator().device_name() == "cuda"
        local_rank = int(os.environ.get("LOCAL_RANK", "0" if not on_cuda or torch.cuda.device_count() <= 1
                                        else str(self.rank % torch.cuda.device_count())))
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(local_rank))
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cascade_rl" / "torch_extensions"))
        if not on_cuda:
            # the shared-memory all-reduce only serves DeepSpeed inference; building it costs 40-130 s per cache
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        if dist.is_initialized():
            if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
                raise RuntimeError(f"torch.distributed is already set up as rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, not rank {self.rank} of {self.world_size}; "
                                   "start one learner per process")
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", auto_mpi_discovery=False,
                                   rank=self.rank, world_size=self.world_size)
        if on_cuda:
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        return torch.device("cpu")

    def _load_model(self) -> Any:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        spec = self.spec
        dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
        self._ds_config = build_ds_config(
            zero_stage=spec.zero_stage, bf16=spec.dtype == "bfloat16", grad_clip=spec.grad_clip,
            offload_optimizer=spec.offload_optimizer, lr=spec.lr, weight_decay=spec.weight_decay,
            on_cuda=self.device.type == "cuda", world_size=self.world_size)
        hf_ds_config = None
        if spec.zero_stage == 3 and importlib.util.find_spec("accelerate") is not None:
            from transformers.integrations import HfDeepSpeedConfig

            # while it lives, from_pretrained partitions weights as it loads (zero.Init). It is process-global, so
            # it is dropped right after. Without accelerate (transformers requires it for this) each rank loads
            # the full model and deepspeed.initialize partitions it.
            hf_ds_config = HfDeepSpeedConfig(self._ds_config)
        cls = AutoModelForImageTextToText if spec.is_vlm else AutoModelForCausalLM
        model = cls.from_pretrained(spec.model_path, dtype=dtype, attn_implementation=self._attn_implementation())
        del hf_ds_config
        model.config.use_cache = False
        self.frozen = freeze_parameters(model, vision=spec.freeze_vision, projector=spec.freeze_projector)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        text_config = model.config.get_text_config()
        head = model.get_output_embeddings()
        # logits == hidden @ W^T (no soft-capping or scaling) is what the hidden-state path assumes
        self._hidden_path = (spec.zero_stage < 3 and getattr(head, "bias", None) is None
                             and getattr(text_config, "final_logit_softcapping", None) is None
                             and getattr(text_config, "logit_scale", None) in (None, 1.0))
        return model

    def _attn_implementation(self) -> str:
        return choose_attention(self.spec.attn_implementation, self.spec.dtype, self.device)

    def _build_engine(self) -> Any:
        import deepspeed

        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)  # ZeRO-3: ds_shape
        groups = [{"params": decay, "weight_decay": self.spec.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizer = None
        if "optimizer" not in self._ds_config:  # torch's AdamW (fused kernel on CUDA): no JIT-built Adam
            optimizer = torch.optim.AdamW(groups, lr=self.spec.lr, betas=(0.9, 0.999), eps=1e-8,
                                          fused=self.device.type == "cuda")
        engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                          model_parameters=None if optimizer is not None else groups,
                                          config=self._ds_config, dist_init_required=False)
        return engine

    def _choose_packing(self) -> bool:
        """Packed rows only where attention is varlen (cost Σ len²); sdpa/eager would attend over the whole row.

        sdpa and eager get the block-diagonal mask as a dense (total × total) mask: correct, but every packed
        row costs total² attention (measured on an H100, Qwen3-0.6B shape, 16k-token micro-batches: 2.8x slower
        than padded rows of similar lengths), so ``auto`` pads there.
        """
        attn = self.model.config._attn_implementation
        want = self.spec.packing == "packed" or (self.spec.packing == "auto" and attn in PACKED_ATTENTION)
        if not want:
            return False
        ok = self._packing_isolates_sequences()
        if not ok and self.spec.packing == "packed":
            raise RuntimeError(f"learner.packing=packed, but with attention {attn!r} packed sequences attend "
                               f"to each other (log-prob change {self.packing_check_diff:.2e}); set "
                               "learner.packing=auto or padded")
        return ok

    @property
    def _text_probe_would_hang(self) -> bool:
        """A VLM under ZeRO-3: a text-only probe would skip the vision tower's parameter gathers, which the other
        ranks' forwards wait on. The self-checks are skipped there (the tests cover that layout)."""
        return bool(self.spec.is_vlm and self.spec.zero_stage == 3)

    def _probe_logprobs(self, seqs: list[tuple[list[int], list[int]]], *, packed: bool) -> list[torch.Tensor]:
        """Response log-probs of (prompt ids, response ids) probes, text only, no gradient."""
        self.engine.module.eval()
        with torch.no_grad():
            mb = build_micro_batch(seqs, packed=packed, pad_token_id=self._pad_id)
            return self._forward(mb, need_vision=False)[0]

    def _apply_fused_kernels(self) -> dict[str, Any]:
        """Patch the model with ``learner.fused_kernels`` (``fused_kernels.py``) and check a probe's log-probs
        moved by rounding only."""
        name = choose_fused_kernels(self.spec.fused_kernels, self.device, is_vlm=self.spec.is_vlm)
        if name == "none":
            return fused_kernels_report(self.model, name, 0, None)
        vocab = self.model.config.get_text_config().vocab_size
        probe = [([(7 * i + 3) % vocab for i in range(24)], [(5 * i + 1) % vocab for i in range(40)]),
                 ([(11 * i + 2) % vocab for i in range(9)], [(3 * i + 4) % vocab for i in range(17)])]
        check = not self._text_probe_would_hang
        before = torch.cat(self._probe_logprobs(probe, packed=False)) if check else None
        patched = apply_fused_kernels(self.model, name)
        diff = None
        if patched and before is not None:
            after = torch.cat(self._probe_logprobs(probe, packed=False))
            diff = check_fused_kernels(before, after, name, str(self.model.config.model_type))
        report = fused_kernels_report(self.model, name, patched, diff)
        if self.rank == 0:
            print(f"[learner] fused kernels: {report}")
        return report

    def _packing_isolates_sequences(self) -> bool:
        """Self-check: in a packed row, does a sequence's output ignore its neighbour's tokens? Else pad.

        With a block-diagonal mask the neighbour's keys get attention weight exactly 0, so changing them leaves
        the log-probs unchanged up to rounding in any dtype; cross-contamination moves them by far more.
        """
        if self._text_probe_would_hang:
            return True
        other = ([7, 8, 9, 10], [11, 12, 13])
        rows = [self._probe_logprobs([first, other], packed=True)[1]
                for first in (([1, 2, 3], [4, 5, 6, 1]), ([6, 5, 4], [3, 2, 1, 2]))]
        self.packing_check_diff = float((rows[0] - rows[1]).abs().max())
        ok = self.packing_check_diff < 1e-4
        if not ok and self.rank == 0:
            print(f"[learner] packed sequences attend across boundaries with this model / attention "
                  f"({self.model.config._attn_implementation}, log-prob change {self.packing_check_diff:.2e}); "
                  "using padded micro-batches instead")
        return ok
