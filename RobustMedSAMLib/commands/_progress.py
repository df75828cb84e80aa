"""What the long sub-commands share: a tqdm bar as a ``progress(done, total)`` callback,
and the meeting of torchrun ranks before rank 0 reports for all."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from RobustMedSAMLib.distributed import DistInfo
from RobustMedSAMLib.progress import Progress


@contextmanager
def progress_bar(desc: str, unit: str, disable: bool = False) -> Iterator[Progress]:
    """A ``progress(done, total)`` callback that draws a bar on stderr while open."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit=unit, total=0, disable=disable, file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        yield progress


def meet_all_ranks(info: DistInfo, later: str) -> bool:
    """Under torchrun: wait for every rank (gloo, hours allowed) and return True. Ranks
    started by hand cannot meet: print that ``later`` sums up, return False."""
    from RobustMedSAMLib import distributed

    if not distributed.init_process_group("cpu", distributed.BARRIER_TIMEOUT):
        print(f"rank {info.rank}: share finished; once every rank has, `{later}` sums up")
        return False
    distributed.barrier()  # every rank's files are written
    distributed.destroy_process_group()
    return True
