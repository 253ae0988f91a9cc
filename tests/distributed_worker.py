"""Run by tests/test_distributed.py under torchrun (not a test module itself):

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py METHOD OUT STOP -- FLAGS...

trains with fsr.py or cifs.py (METHOD) and FLAGS, then saves this process's final network as
OUT/rank<r>.pt, so that the test can compare the weights of every process (the run folder holds
only rank 0's checkpoint). STOP > 0 interrupts every process when epoch STOP + 1 would be saved,
like a job killed after STOP epochs.
"""

import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
torch.set_num_threads(1)


class Interrupted(Exception):
    pass


def main():
    method, out, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
    flags = sys.argv[sys.argv.index("--") + 1:]
    module = importlib.import_module(method)
    built = []
    build_network = module.build_network
    module.build_network = lambda args: built.append(build_network(args)) or built[-1]
    if stop:
        rng_states, saves = module.rng_states, []

        def interrupting(device):  # called by every process once per epoch, before saving
            saves.append(device)
            if len(saves) > stop:
                raise Interrupted
            return rng_states(device)
        module.rng_states = interrupting
    try:
        module.train(models.parse_args(module.Args, flags))
    except Interrupted:
        pass
    torch.save(built[0].state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    main()
