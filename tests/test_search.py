"""Searching your own footage: the synthetic test scene (two camera videos, a tracker's gap and id switch, the truth)
cut into tracklets and searched with the session's trained checkpoint; the page in Chromium; and every bad input of
issue 29, each with the error or the counted skip it gets."""
from __future__ import annotations
import json, subprocess, sys
from dataclasses import asdict
from pathlib import Path
import numpy as np
import pandas as pd
import papermill as pm
import pytest
import torch
from PIL import Image
from stmn.checkpoints import CheckpointError
from stmn.scene import make_scene_videos, write_video, CAMERAS
from stmn.search import SearchConfig, run_search, load_search_model
from stmn.tracks import TrackFileError, VideoError, cut_video, read_crop_folders, MANIFEST
from test_browser import browser, Recorder                 # noqa: F401  (the module's Chromium fixture)

TOP1_FLOOR = .6          # "most queries": the share of queries whose first match is their own person, at least


def truth_of(truth: dict, name: str) -> int:
    "The person a tracklet `<camera>:<track>[.<part>]` follows."
    camera, _, track = name.partition(":")
    return truth["videos"][camera][track.split(".")[0]]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")/"scene"
    return folder, make_scene_videos(folder)


@pytest.fixture(scope="module")
def searched(scene, trained_run, tmp_path_factory):
    "The job notebook, as a user runs it: cam1 (the gallery) searched with every tracklet of cam2 (the queries)."
    folder, _ = scene
    out = tmp_path_factory.mktemp("search")
    pm.execute_notebook("nbs/search.ipynb", str(out/"search.ipynb"), cwd=str(Path(__file__).parents[1]), progress_bar=False,
                        parameters=dict(checkpoint=str(trained_run/"checkpoint.pt"), gallery=str(folder/"cam1.mp4"),
                                        gallery_tracks=str(folder/"cam1.txt"), query=str(folder/"cam2.mp4"),
                                        query_tracks=str(folder/"cam2.txt"), k=5, out_dir=str(out/"out")))
    return out/"out"


@pytest.mark.slow
def test_each_person_is_found_first_in_the_other_video(searched, scene):
    _, truth = scene
    table = pd.read_csv(searched/"results.csv")
    first = table[table["rank"] == 1]
    hits = [truth_of(truth, q) == truth_of(truth, m) for q, m in zip(first["query"], first["match"])]
    print(f"cross-video: the right person first for {sum(hits)} of {len(hits)} queries")
    assert len(hits) == 5 and np.mean(hits) >= TOP1_FLOOR, first
    res = json.loads((searched/"results.json").read_text())
    assert res["n_query"] == 5 and res["n_gallery"] == 7 and len(res["results"]) == len(table) == 5 * 5


@pytest.mark.slow
def test_every_tracklet_against_every_other_finds_the_tracker_split_people(searched, scene, trained_run):
    """Within cam1, from a shell: the two parts of the track with a gap and the two tracks of the switched person
    find each other first (the cached gallery: nothing is cut or embedded again)."""
    folder, truth = scene
    cached = sorted(p.name for p in (searched/"cache").iterdir())
    r = subprocess.run([sys.executable, "-m", "stmn.search", "--checkpoint", str(trained_run/"checkpoint.pt"),
                        "--gallery", str(folder/"cam1.mp4"), "--gallery-tracks", str(folder/"cam1.txt"), "--k", "3",
                        "--out-dir", str(searched)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (searched/"cache").iterdir()) == cached
    table = pd.read_csv(searched/"results.csv"); first = table[table["rank"] == 1].set_index("query")["match"]
    split = [q for q in first.index if sum(truth_of(truth, q) == truth_of(truth, o) for o in first.index) == 2]
    hits = [truth_of(truth, q) == truth_of(truth, first[q]) for q in split]
    print(f"within cam1: of the {len(split)} tracklets the tracker split, {sum(hits)} find their other half first")
    assert len(split) == 4 and np.mean(hits) >= TOP1_FLOOR


@pytest.mark.slow
def test_the_page_shows_every_clip_in_chromium(searched, browser):
    page = browser.new_page(); rec = Recorder(page)
    page.goto((searched/"search.html").as_uri())
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.naturalWidth, e.naturalHeight])")
    rows = len(pd.read_csv(searched/"results.csv"))                  # the last search's: 7 queries, up to 3 matches each
    assert len(images) == 7 + rows              # each query's clip and each match's (a query seen with all others has none)
    assert all(w > 100 and h > 96 for _, w, h in images), images
    assert sum(alt.startswith("query") for alt, _, _ in images) == 7
    assert page.locator("h2").count() == 7 and not rec.problems, rec.problems
    page.close()


@pytest.mark.slow
def test_a_tracklet_queried_by_name_or_as_a_folder_of_its_crops(searched, scene, trained_run, tmp_path):
    folder, _ = scene
    base = dict(checkpoint=str(trained_run/"checkpoint.pt"), gallery=str(folder/"cam1.mp4"), gallery_tracks=str(folder/"cam1.txt"),
                k=3, out_dir=str(searched))
    one = run_search(SearchConfig(**base, query="cam1:3.1"))
    assert [t.name for t in one.queries] == ["cam1:3.1"] and one.table["match"].iloc[0] == "cam1:3.2"   # its other half
    with pytest.raises(KeyError, match="no such tracklet.*cam1:1"): run_search(SearchConfig(**base, query="cam1:99"))
    crops = next(t for t in one.gallery if t.name == "cam1:3.1").frames
    (tmp_path/"mine"/"walker").mkdir(parents=True)
    for f in crops: (tmp_path/"mine"/"walker"/Path(f).name).write_bytes(Path(f).read_bytes())
    mine = run_search(SearchConfig(**base, query=str(tmp_path/"mine")))
    best = mine.table.iloc[0]
    assert (best["query"], best["match"]) == ("mine:walker", "cam1:3.1") and best["distance"] < 1e-5    # the same crops: the same descriptor


def test_a_state_dict_saved_by_the_authors_code_searches(scene, tmp_path):
    "Their ResNet-50 STMN (the equivalence test's seeded weights, saved as their code saves them), at a small input size."
    from helpers import seeded_tensor
    meta = json.loads(str(np.load(Path(__file__).parent/"fixtures"/"authors_stmn.npz")["meta"]))
    torch.save({"state_dict": {f"module.{n}": seeded_tensor(n, s) for n, s in zip(meta["names"], meta["shapes"])}}, tmp_path/"theirs.pth")
    folder, _ = scene
    base = dict(checkpoint=str(tmp_path/"theirs.pth"), gallery=str(folder/"cam1.mp4"), gallery_tracks=str(folder/"cam1.txt"),
                sampling="rrs", k=2, out_dir=str(tmp_path/"out"))
    with pytest.raises(CheckpointError, match="give height and width"): run_search(SearchConfig(**base))
    res = run_search(SearchConfig(**base, height=64, width=32))
    assert len(res.queries) == 7 and json.loads((tmp_path/"out/results.json").read_text())["clip"][1:] == [64, 32]


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    "Ten 64×48 frames and a track file with one clean track."
    d = tmp_path_factory.mktemp("tiny")
    write_video(d/"v.mp4", (np.full((48, 64, 3), 40 * (i % 5), np.uint8) for i in range(10)), fps=5)
    (d/"v.txt").write_text("".join(f"{f},1,10,5,12,30,0.9,-1,-1,-1\n" for f in range(1, 11)))
    return d


def test_unreadable_and_truncated_videos(tiny_video, tmp_path):
    (tmp_path/"junk.mp4").write_bytes(b"\0not a video" * 100)
    with pytest.raises(VideoError, match="junk.mp4"): cut_video(tmp_path/"junk.mp4", tiny_video/"v.txt", tmp_path/"crops")
    data = (tiny_video/"v.mp4").read_bytes()
    (tmp_path/"cut.mp4").write_bytes(data[:len(data) // 2])           # an interrupted copy: the index at the end is gone
    with pytest.raises(VideoError, match="cut.mp4"): cut_video(tmp_path/"cut.mp4", tiny_video/"v.txt", tmp_path/"crops")
    with pytest.raises(FileNotFoundError, match="nowhere.mp4"): cut_video(tmp_path/"nowhere.mp4", tiny_video/"v.txt", tmp_path/"crops")


def test_a_video_shorter_than_its_track_file_counts_the_boxes_past_its_end(tiny_video, tmp_path):
    (tmp_path/"long.txt").write_text("".join(f"{f},1,10,5,12,30\n" for f in range(1, 16)))
    ts, skipped = cut_video(tiny_video/"v.mp4", tmp_path/"long.txt", tmp_path/"crops")
    assert [len(t) for t in ts] == [10] and skipped["boxes after the video's last decoded frame (10)"]["count"] == 5


def test_track_files_with_the_wrong_columns(tiny_video, tmp_path):
    for text, says in (("1,1,10,5\n", "4 fields"), ("frame,id,x,y,w,h\n1,1,1,1,1,1\n", "line 1: column 1 (frame)"),
                       ("1.5,1,10,5,12,30\n", "whole numbers")):
        (tmp_path/"t.txt").write_text(text)
        with pytest.raises(TrackFileError, match=r"t\.txt") as e: cut_video(tiny_video/"v.mp4", tmp_path/"t.txt", tmp_path/"crops")
        assert says in str(e.value), e.value
    (tmp_path/"b.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(TrackFileError, match="not a text file"): cut_video(tiny_video/"v.mp4", tmp_path/"b.txt", tmp_path/"crops")


def test_boxes_outside_zero_size_and_short_tracklets_are_counted(tiny_video, tmp_path):
    rows = ([f"{f},1,-6,5,12,30\n" for f in range(1, 6)]              # half outside on the left: cut, kept
            + [f"{f},2,100,5,12,30\n" for f in range(1, 6)]           # wholly outside a 64-wide frame
            + [f"{f},3,10,5,0,30\n" for f in range(1, 4)]             # zero width
            + ["1,4,10,5,12,30\n", "2,4,10,5,12,30\n"])               # two frames: shorter than min_frames 3
    (tmp_path/"t.txt").write_text("".join(rows))
    ts, skipped = cut_video(tiny_video/"v.mp4", tmp_path/"t.txt", tmp_path/"crops", min_frames=3)
    assert [(t.name, len(t)) for t in ts] == [("v:1", 5)]
    with Image.open(ts[0].frames[0]) as im: assert im.size == (6, 30)               # the part inside the frame
    counts = {k: v["count"] for k, v in skipped.items()}
    assert counts == {"boxes cut at the frame's edge (kept)": 5, "boxes wholly outside the frame": 5, "zero-size boxes": 3,
                      "tracklets shorter than min_frames=3": 1}                      # track 4


def test_crop_folders_empty_or_with_other_files(tmp_path):
    (tmp_path/"none").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"): read_crop_folders(tmp_path/"none")
    with pytest.raises(FileNotFoundError, match="does not exist"): read_crop_folders(tmp_path/"missing")
    for name in ("a", "b"): (tmp_path/"crops"/name).mkdir(parents=True)
    Image.new("RGB", (16, 32)).save(tmp_path/"crops/a/1.jpg")
    (tmp_path/"crops/a/Thumbs.db").write_bytes(b"\0"); (tmp_path/"crops/b/notes.txt").write_text("x")
    ts, skipped = read_crop_folders(tmp_path/"crops")
    assert [t.name for t in ts] == ["crops:a"]
    assert {k: v["count"] for k, v in skipped.items()} == {"files that are not images": 2, "folders with no images": 1}


def test_a_checkpoint_of_another_architecture_is_named(tmp_path):
    from helpers import tiny
    from stmn.recipes import build_model
    run = tiny(); weights = build_model(run, 4).state_dict()           # a ResNet-10's weights …
    torch.save(dict(model=weights, params=dict(asdict(run), backbone="resnet18"), epoch=0), tmp_path/"other.pt")   # … said to be a ResNet-18's
    with pytest.raises(CheckpointError, match="other.pt.*do not fit"): load_search_model(SearchConfig(checkpoint=str(tmp_path/"other.pt")))
    import torchvision
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path/"plain.pt")
    with pytest.raises(CheckpointError, match="give height and width"): load_search_model(SearchConfig(checkpoint=str(tmp_path/"plain.pt")))
    with pytest.raises(CheckpointError, match="neither this project's checkpoint nor the authors'"):
        load_search_model(SearchConfig(checkpoint=str(tmp_path/"plain.pt"), height=256, width=128, L=4))
