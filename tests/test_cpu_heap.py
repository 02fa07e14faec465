"""The heap settings of CPU training, observed in a fresh process: memory a step frees stays in the process."""
import pytest

from .conftest import run_cli

FREE_A_BLOCK = """
import gc, sys, psutil, torch
from mea.cpu_heap import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
rss = psutil.Process().memory_info().rss
x = torch.ones(4 << 20)  # 16 MiB, an activation of the CPU bench: glibc would map it and unmap it on free
del x
gc.collect()
print((psutil.Process().memory_info().rss - rss) >> 20)
"""


@pytest.mark.parametrize("heap, kept_mib", [("default", (-4, 4)), ("kept", (15, 20))])
def test_freed_activation_memory_stays_in_the_process_only_when_kept(heap, kept_mib):
    proc = run_cli("-c", FREE_A_BLOCK, heap)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert kept_mib[0] <= int(proc.stdout.split()[-1]) <= kept_mib[1], proc.stdout
