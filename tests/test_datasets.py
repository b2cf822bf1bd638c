"""Every loader on miniature copies of the real layouts: counts as written, protocols, splits and every bad case."""
import json
import shutil
import numpy as np
import pytest
import scipy.io
from stmn.data import DATASETS, PUBLISHED, check_counts, load_dataset
from stmn.base import BadImageError, DatasetLayoutError
from stmn.miniature import write_mini_dukev, write_mini_ilidsvid, write_mini_lsvid, write_mini_mars, write_mini_prid2011

WRITERS = {"mars": write_mini_mars, "dukev": write_mini_dukev, "lsvid": write_mini_lsvid,
           "ilidsvid": write_mini_ilidsvid, "prid2011": write_mini_prid2011}


@pytest.fixture
def mars(tmp_path):
    root = tmp_path/"MARS"
    return root, write_mini_mars(root)


def truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


def test_all_six_names_load_through_the_one_entry_point(tmp_path, data_home):
    for name, write in WRITERS.items():
        write(tmp_path/name)
        ds = load_dataset(name, tmp_path/name)
        assert ds.name == name and ds.train and ds.query and ds.gallery, name
        assert "dropped:" in ds.summary() and f"{name} (protocol: " in ds.summary()
    ds = load_dataset("synth", None, n_train_ids=3, n_test_ids=3, n_distractor_tracklets=1, n_junk_tracklets=1)
    assert ds.name == "synth" and len({t.pid for t in ds.train}) == 3
    assert set(DATASETS) == set(WRITERS) | {"synth"} and set(PUBLISHED) == set(WRITERS)


@pytest.mark.parametrize("protocol", ["paper", "matlab", "torchreid"])
def test_mars_counts_match_what_was_written(mars, protocol):
    root, counts = mars
    ds = load_dataset("mars", root, protocol)
    assert ds.protocol == protocol and check_counts(ds, counts) == []
    assert {t.pid for t in ds.query} <= {t.pid for t in ds.gallery} | {t.pid for t in ds.test_all}
    assert (-1 in {t.pid for t in ds.gallery}) == (protocol == "matlab")
    q = {t.frames for t in ds.query}
    assert any(t.frames in q for t in ds.gallery) == (protocol != "torchreid")


def test_check_counts_names_each_disagreement(mars):
    root, counts = mars
    ds = load_dataset("mars", root)
    wrong = check_counts(ds, PUBLISHED["mars"])
    assert "train: 3 identities, published 625" in wrong and "query: 7 tracklets, published 1980" in wrong
    assert not any(w.startswith("gallery/matlab") for w in wrong)        # only the protocol in use is compared


def test_mars_metadata_only(mars):
    root, counts = mars
    shutil.rmtree(root/"bbox_train"); shutil.rmtree(root/"bbox_test")
    with pytest.raises(DatasetLayoutError, match="missing folder .*bbox_train"):
        load_dataset("mars", root)
    assert check_counts(load_dataset("mars", root, verify="none"), counts) == []


@pytest.mark.parametrize("change, message", [
    (lambda r: (r/"info/query_IDX.mat").unlink(), "missing file .*query_IDX.mat"),
    (lambda r: (r/"info/test_name.txt").unlink(), "missing file .*test_name.txt"),
    (lambda r: scipy.io.savemat(r/"info/query_IDX.mat", {"query_IDX": np.array([[1, 999]])}), "query rows must lie in 1..12"),
    (lambda r: scipy.io.savemat(r/"info/query_IDX.mat", {"queries": np.array([[1]])}), "has no variable 'query_IDX'"),
    (lambda r: (r/"info/tracks_test_info.mat").write_bytes(b"garbage"), "cannot read .*tracks_test_info.mat"),
])
def test_mars_missing_or_broken_info_files(mars, change, message):
    root, _ = mars
    change(root)
    with pytest.raises(DatasetLayoutError, match=message) as e:
        load_dataset("mars", root)
    assert "expected the MARS layout" in str(e.value) and "zheng-lab" in str(e.value)


def test_mars_info_rows_out_of_range_or_inconsistent(mars):
    root, _ = mars
    info = scipy.io.loadmat(root/"info/tracks_test_info.mat")["track_test_info"]
    info[2, 1] = 10_000                                                  # row 3 runs past the name list
    info[4, 3] = 6 if info[4, 3] != 6 else 5                             # row 5 names another camera
    scipy.io.savemat(root/"info/tracks_test_info.mat", {"track_test_info": info})
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("mars", root)
    assert "tracks_test_info.mat row 3: frames" in str(e.value) and "tracks_test_info.mat row 5 (pid" in str(e.value)


def test_mars_missing_image_is_named(mars):
    root, _ = mars
    first = (root/"info/train_name.txt").read_text().split()[0]
    (root/"bbox_train"/first[:4]/first).unlink()
    with pytest.raises(DatasetLayoutError, match=f"row 1: missing image .*{first}"):
        load_dataset("mars", root)


def test_truncated_image_is_an_error_or_skipped_and_counted(mars):
    root, _ = mars
    name = (root/"info/test_name.txt").read_text().split()[1]
    truncate(root/"bbox_test"/name[:4]/name)
    load_dataset("mars", root)                                           # not decoded by default
    with pytest.raises(BadImageError, match=name):
        load_dataset("mars", root, verify="decode")
    ds = load_dataset("mars", root, verify="decode", bad_images="skip")
    assert ds.dropped == {"unreadable images (skipped)": 1}
    assert "dropped: 1 unreadable images (skipped)" in ds.summary()
    assert not any(name in f for t in ds.gallery + ds.query for f in t.frames)
    with pytest.raises(ValueError, match="bad_images="):
        load_dataset("mars", root, verify="decode", bad_images="ignore")


def test_supplement_validation_split_through_load_dataset(mars, tmp_path):
    root, _ = mars
    write_mini_mars(tmp_path/"big", n_train=12, n_test=2)
    halves = [load_dataset("mars", tmp_path/"big", split=s, trial=2) for s in (0, 1)]
    ids = [{t.pid for t in h.train} for h in halves]
    assert ids[0].isdisjoint(ids[1]) and len(ids[0] | ids[1]) == 12 and len(ids[0]) == 6
    assert all({t.pid for t in h.gallery} == ids[1 - i] for i, h in enumerate(halves))
    assert halves[0].split == "supplement half 0, trial 2" and "validation:" in halves[0].summary()
    again = load_dataset("mars", tmp_path/"big", split=0, trial=2)
    assert [t.frames for t in again.query] == [t.frames for t in halves[0].query]
    with pytest.raises(ValueError, match="split=3"):
        load_dataset("mars", root, split=3)


def test_dukev_counts_and_bad_cases(tmp_path):
    root = tmp_path/"duke"
    counts = write_mini_dukev(root)
    assert check_counts(load_dataset("dukev", root), counts) == []
    (root/"gallery/0004/0007").mkdir()                                   # an empty tracklet folder: counted, not hidden
    ds = load_dataset("dukev", root)
    assert ds.dropped == {"empty tracklet folders": 1} and "dropped: 1 empty tracklet folders" in ds.summary()
    src = next((root/"train/0001/0001").iterdir())
    shutil.copy(src, root/"train/0001/0001"/"0001_C8_F0077_X99999.jpg")   # a second camera in one tracklet
    with pytest.raises(DatasetLayoutError, match="train/0001/0001: frames from cameras"):
        load_dataset("dukev", root)
    shutil.rmtree(root/"query")
    with pytest.raises(DatasetLayoutError, match="missing folder .*query"):
        load_dataset("dukev", root)


def test_lsvid_bad_cases(tmp_path):
    root = tmp_path/"ls"
    write_mini_lsvid(root)
    lst = root/"list_sequence/list_seq_train.txt"
    good = lst.read_text()
    lst.write_text(good + "tracklet_train/9999/9999_0001_01_ 9999\n")
    with pytest.raises(DatasetLayoutError, match=r"list_seq_train.txt line 7: no frame matches tracklet_train/9999"):
        load_dataset("lsvid", root)
    lst.write_text(good + "just-one-column\n")
    with pytest.raises(DatasetLayoutError, match="line 7: expected '<prefix> <pid>'"):
        load_dataset("lsvid", root)
    lst.write_text(good)
    test = root/"list_sequence/list_seq_test.txt"
    test.write_text("\n".join(test.read_text().splitlines()[:-1]) + "\n")  # one test line fewer than info_test rows
    with pytest.raises(DatasetLayoutError, match="info_test has shape"):
        load_dataset("lsvid", root)
    (root/"test/data/info_test.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="missing file .*info_test.mat") as e:
        load_dataset("lsvid", root)
    assert "pkuvmc" in str(e.value)


def test_lsvid_camera_outside_1_to_15_is_named(tmp_path):
    root = tmp_path/"ls"
    write_mini_lsvid(root)
    first = sorted((root/"tracklet_train/1000").iterdir())[0]
    shutil.copy(first, first.with_name("1000_0009_16_0001.jpg"))             # camera 16 does not exist
    lst = root/"list_sequence/list_seq_train.txt"
    lst.write_text(lst.read_text() + "tracklet_train/1000/1000_0009_16_ 1000\n")
    with pytest.raises(DatasetLayoutError, match="line 7: frame names need four _-separated fields"):
        load_dataset("lsvid", root)


def test_ilidsvid_bad_cases(tmp_path):
    root = tmp_path/"il"
    meta = write_mini_ilidsvid(root)
    ls = root/"train-test people splits/train_test_splits_ilidsvid.mat"
    bad = meta["ls_set"].copy(); bad[4, 0] = bad[4, 1]
    scipy.io.savemat(ls, {"ls_set": bad.astype(float)})
    load_dataset("ilidsvid", root, split=3)
    with pytest.raises(DatasetLayoutError, match="row 5 is not a permutation of 1..6"):
        load_dataset("ilidsvid", root, split=4)
    scipy.io.savemat(ls, {"ls_set": meta["ls_set"][:, :4].astype(float)})
    with pytest.raises(DatasetLayoutError, match=r"ls_set has shape \(10, 4\), expected 10×6"):
        load_dataset("ilidsvid", root)
    ls.unlink()
    with pytest.raises(DatasetLayoutError, match="missing file .*train_test_splits_ilidsvid.mat"):
        load_dataset("ilidsvid", root)
    shutil.rmtree(root/"i-LIDS-VID/sequences/cam2"/meta["people"][0])
    with pytest.raises(DatasetLayoutError, match="cam1 and cam2 person folders differ"):
        load_dataset("ilidsvid", root)


def test_prid_rule_and_bad_splits(tmp_path):
    root = tmp_path/"prid"
    meta = write_mini_prid2011(root)
    ds = load_dataset("prid2011", root, split=0)
    assert len({t.pid for t in ds.train}) + len(ds.query) == len(meta["kept"]) and len(ds.query) == len(ds.gallery)
    assert ds.split == "0 of 10" and "fewer than 27 frames" in ds.summary()
    loose = load_dataset("prid2011", root, split=0, min_frames=1)          # the split file names the 27-frame people only
    assert loose.dropped["tracklets of kept people in neither half of split 0"] == meta["short_tracklets"]
    splits = json.loads((root/"splits_prid2011.json").read_text())
    splits[0]["test"][0] = "person_0099"
    (root/"splits_prid2011.json").write_text(json.dumps(splits))
    with pytest.raises(DatasetLayoutError, match="split 0 names people that are not kept, e.g. person_0099"):
        load_dataset("prid2011", root, split=0)
    with pytest.raises(DatasetLayoutError, match="tugraz"):
        load_dataset("prid2011", tmp_path/"nowhere")


def test_root_is_required_and_names_are_checked(tmp_path):
    for name in WRITERS:
        with pytest.raises(ValueError, match=f"data_root is required for dataset '{name}'"):
            load_dataset(name)
    with pytest.raises(ValueError, match="dataset='market'"):
        load_dataset("market", tmp_path)
