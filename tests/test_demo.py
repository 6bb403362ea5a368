"""The demo CLIP's pre-training gives the same weights whatever the machine's thread count."""

import torch

import pini.demo


def test_the_demo_clip_pre_trains_on_one_thread_and_restores_the_count(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(pini.demo, "_pretrain", lambda *args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pini.demo.digits_clip(tmp_path, progress=False)
        assert seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_demo_clips_weights_do_not_depend_on_the_thread_count(tmp_path, monkeypatch):
    monkeypatch.setattr(pini.demo, "PRETRAIN_STEPS", 3)
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            clip, _ = pini.demo.digits_clip(tmp_path / str(threads), progress=False)
            states.append(clip.state_dict())
    finally:
        torch.set_num_threads(before)
    assert states[0].keys() == states[1].keys()
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name
