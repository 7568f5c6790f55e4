"""Tasks of different drivers (jobs) share a node fairly: one driver's
backlog does not hold up another driver's tasks."""
import os
import subprocess
import sys
import textwrap
import time

import minray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_drivers_backlog_does_not_hold_up_another_drivers_task(tmp_path):
    order = tmp_path / "order"
    context = minray.init(num_cpus=1)
    try:
        @minray.remote
        def step(path, name):
            time.sleep(0.05)
            with open(path, "a") as f:
                f.write(name + "\n")

        backlog = [step.remote(str(order), f"first-{i}") for i in range(80)]   # ~4 s of work
        deadline = time.monotonic() + 30
        while not order.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        other_driver = textwrap.dedent("""
            import sys, minray
            minray.init(address=sys.argv[1])
            @minray.remote
            def mark(path):
                with open(path, "a") as f:
                    f.write("second\\n")
            minray.get(mark.remote(sys.argv[2]))
        """)
        subprocess.run([sys.executable, "-c", other_driver, context["session_dir"], str(order)],
                       env=dict(os.environ, PYTHONPATH=REPO), check=True, timeout=120)
        minray.get(backlog)
        lines = order.read_text().split()
        assert len(lines) == 81
        # FIFO would put it last (after all 80); shared, it runs once the
        # worker's current task is done.
        assert lines.index("second") < 60, lines.index("second")
    finally:
        minray.shutdown()
