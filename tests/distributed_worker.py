"""Run by tests/test_distributed.py under torchrun (not a test module itself):

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py METHOD OUT STOP [cpu-sync-bn] -- FLAGS...

trains with fsr.py or cifs.py (METHOD) and FLAGS, then saves this process's final network as
OUT/rank<r>.pt, so that the test can compare the weights of every process (the run folder holds
only rank 0's checkpoint). STOP > 0 interrupts every process when epoch STOP + 1 would be saved,
like a job killed after STOP epochs. cpu-sync-bn: every BatchNorm of the network computes the
statistics of the global batch (CPUSyncBatchNorm below: torch's nn.SyncBatchNorm, which --sync-bn uses,
needs CUDA), so that a 2-process run can be compared with a 1-process one. After every step each
process checks that all its buffers equal rank 0's (`checked`), failing the run otherwise.
"""

import importlib
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_support  # noqa: E402
torch.set_num_threads(1)


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch across all
    processes, for the CPU (gloo): torch's nn.SyncBatchNorm accepts only GPU tensors. The per-rank
    sums are added with torch.distributed.nn's autograd-aware all_reduce, whose backward is again
    an all_reduce, so gradients are those of the global batch too. Eval mode, or a single process,
    is plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)
        sums = torch.cat([x.float().sum((0, 2, 3)), (x.float() ** 2).sum((0, 2, 3)), count])
        sums = dist_functional.all_reduce(sums)
        channels = x.shape[1]
        total = sums[-1]
        mean = sums[:channels] / total
        var = (sums[channels:2 * channels] / total - mean ** 2).clamp_min(0)  # biased, as BatchNorm normalises
        with torch.no_grad():  # running statistics: momentum update with the unbiased variance
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var.detach() * total / (total - 1)).to(self.running_var.dtype), momentum)
        shape = (1, channels, 1, 1)
        out = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)




def convert_to_cpu_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d of `model` becomes a CPUSyncBatchNorm with the same weights and statistics."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            convert_to_cpu_sync_batchnorm(child)
    return model


class Interrupted(Exception):
    pass


def checked(broadcast):
    """run_support.broadcast_buffers, then a check that every buffer (num_batches_tracked too) equals rank 0's."""
    def broadcast_and_check(model, sync_bn=False):
        broadcast(model, sync_bn)
        for name, buffer in model.named_buffers():
            reference = buffer.clone()
            dist.broadcast(reference, 0)
            if not torch.equal(reference, buffer):
                raise AssertionError(f"rank {dist.get_rank()}: {name} differs from rank 0's after a step")
    return broadcast_and_check


def main():
    method, out, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
    flags = sys.argv[sys.argv.index("--") + 1:]
    module = importlib.import_module(method)
    built = []
    build_network = module.build_network
    convert = convert_to_cpu_sync_batchnorm if "cpu-sync-bn" in sys.argv[4:sys.argv.index("--")] else (lambda m: m)
    module.build_network = lambda args: built.append(convert(build_network(args))) or built[-1]
    module.broadcast_buffers = checked(module.broadcast_buffers)  # every step: every buffer equal to rank 0's
    if stop:
        rng_states, saves = module.rng_states, []

        def interrupting(device):  # called by every process once per epoch, before saving
            saves.append(device)
            if len(saves) > stop:
                raise Interrupted
            return rng_states(device)
        module.rng_states = interrupting
    try:
        module.train(run_support.parse_args(module.Args, flags))
    except Interrupted:
        pass
    torch.save(built[0].state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    main()
