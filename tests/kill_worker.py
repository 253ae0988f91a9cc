"""Run by tests/test_runs.py in a subprocess (not a test module itself):

    python tests/kill_worker.py METHOD WHEN EPOCH -- FLAGS...

trains with fsr.py or cifs.py (METHOD) and FLAGS and kills itself with SIGKILL at epoch EPOCH
(1-indexed), WHEN:
  during-save   half-way through writing last.pt's temporary file (a kill inside torch.save);
  after-save    after last.pt is in place, before metrics.jsonl is rewritten (between save and log).
"""

import importlib
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_support  # noqa: E402


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    method, when, epoch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    flags = sys.argv[sys.argv.index("--") + 1:]
    module = importlib.import_module(method)
    save_checkpoint, write_metrics = module.save_checkpoint, module.write_metrics

    def saving(state, path):
        if when == "during-save" and state["epoch"] == epoch and path.endswith("last.pt"):
            with open(f"{path}.tmp{os.getpid()}", "wb") as file:  # what torch.save had written so far
                file.write(b"PK\x03\x04 half a checkpoint")
            die()
        save_checkpoint(state, path)

    def logging(run_dir, history):
        if when == "after-save" and history and history[-1]["epoch"] == epoch:
            die()
        write_metrics(run_dir, history)

    module.save_checkpoint, module.write_metrics = saving, logging
    module.train(run_support.parse_args(module.Args, flags), log=lambda *_: None)


if __name__ == "__main__":
    main()
