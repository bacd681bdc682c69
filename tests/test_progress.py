"""memlens.progress: which runs train, wait and are done, and the time left, computed from the epochs seen."""

from memlens.progress import TrainingProgress, clock


def test_progress_lines_and_time_left():
    t = [0.0]
    lines = []
    p = TrainingProgress({"a": 4, "b": 4, "c": 4}, jobs=2, log=lines.append, now=lambda: t[0])
    p.start("a")
    p.start("b")
    assert lines[-1] == "train b: started (2 running, 1 waiting, 0 done)"
    for e in (1, 2):
        t[0] += 10
        p.epoch("a", e, 10.0)
        p.epoch("b", e, 10.0)
    # half of b: 20 s elapsed, 20 s left for it; all training: (2 + 2 + 4 epochs) x 10 s / 2 at a time
    assert "train b: epoch 2/4, 0:20 elapsed, about 0:20 left (all training: about 0:40 left)" in lines
    for e in (3, 4):
        t[0] += 10
        p.epoch("a", e, 10.0)
        p.epoch("b", e, 10.0)
    p.finish("a")
    assert lines[-1] == "train a: done in 0:40 (1 running, 1 waiting, 1 done; about 0:20 of training left)"
    p.finish("b")
    p.start("c")
    p.finish("c")
    assert lines[-1].endswith("(0 running, 0 waiting, 3 done)") and clock(3725) == "1:02:05"
