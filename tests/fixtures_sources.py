"""Tiny releases in each dataset's exact annotation format (specs/datasets.md), for adapter tests.

Each `write_<source>(root)` writes the annotation files and zero-byte placeholder videos under
`root` (adapters only check that videos exist; nothing is decoded) and returns nothing; the
tests hold the hand-computed rows each fixture must produce. Content is invented, shapes are
the releases'. Deliberate flaws (missing videos, empty captions, out-of-range times) are
commented where they are planted.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def write_msrvtt(root: Path, test_delimiter: str = ",") -> None:
    d = "msrvtt_data/"  # the zip unzips into a subfolder; adapters look two levels down
    data = {
        "info": {"year": "2016", "version": "1.0"},
        "videos": [{"id": i, "video_id": f"video{i}", "category": 9, "url": "https://youtu.be/x",
                    "start time": 1.0, "end time": 11.0, "split": "train"} for i in (0, 1, 2, 3)],
        "sentences": [
            {"sen_id": 0, "video_id": "video0", "caption": "a red car drives along a wet road"},
            {"sen_id": 1, "video_id": "video1", "caption": "a woman stirs soup in a pot"},
            {"sen_id": 2, "video_id": "video0", "caption": " a car on a road "},
            {"sen_id": 3, "video_id": "video1", "caption": "   "},  # empty after strip: rejected
            {"sen_id": 4, "video_id": "video2", "caption": "a dog runs"},
            {"sen_id": 5, "video_id": "video3", "caption": "no file for this one"},
            {"sen_id": 6, "video_id": "video7011", "caption": "a json caption of a test video"},
        ],
    }
    write(root, d + "MSRVTT_data.json", json.dumps(data))
    write(root, d + "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo1\nvideo2\nvideo3\n")
    write(root, d + "MSRVTT_train.7k.csv", "video_id,extra\nvideo0,x\nvideo1,y\n")
    sep = test_delimiter
    write(root, d + "MSRVTT_JSFUSION_test.csv",
          f"key{sep}vid_key{sep}video_id{sep}sentence\n"
          f"ret0{sep}msr7011{sep}video7011{sep}a dog chases a ball, then naps\n"
          f"ret1{sep}msr8450{sep}video8450{sep}two men talk at a news desk\n")  # no video
    touch(root, "MSRVTT_Videos/video0.mp4", "MSRVTT_Videos/video1.mp4", "MSRVTT_Videos/video2.webm",
          "MSRVTT_Videos/video7011.mp4")


MSVD_CAPTIONS = {
    "AbCd-fG_hIj_12_20": [["a", "cat", "plays", "a", "piano"], ["a", "kitten", "is", "playing", "keys"]],
    "ZyXwVuT5srq_0_7": [["a", "man", "slices", "bread"]],
    "cSDkshD2ME0_11_14": [["a", "car", "turns"], []],  # an empty token list: rejected
    "gone_clip_1_2": [["no", "video"]],
}


def write_msvd(root: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    (root / "msvd_data").mkdir(parents=True, exist_ok=True)
    (root / "msvd_data/raw-captions.pkl").write_bytes(pickle.dumps(MSVD_CAPTIONS, protocol=protocol))
    write(root, "msvd_data/train_list.txt", "AbCd-fG_hIj_12_20\ngone_clip_1_2\n")
    write(root, "msvd_data/val_list.txt", "ZyXwVuT5srq_0_7\n")
    write(root, "msvd_data/test_list.txt", "cSDkshD2ME0_11_14\nnot_in_pickle_3_4\n")
    touch(root, "YouTubeClips/AbCd-fG_hIj_12_20.avi", "YouTubeClips/ZyXwVuT5srq_0_7.avi",
          "YouTubeClips/cSDkshD2ME0_11_14.avi")


LSMDC_A = "0005_Some_Movie_00.01.02.345-00.01.05.678"
LSMDC_B = "3011_OTHER_FILM_01.11.23.496-01.11.25.853"
LSMDC_C = "0007_Movie_With_Under_Scores_00.00.01.000-00.00.03.500"


def write_lsmdc(root: Path) -> None:
    t = "\t"
    write(root, "LSMDC16_annos_training.csv", "\n".join([
        t.join([LSMDC_A, "00.01.02.345", "00.01.05.678", "00.01.02.345", "00.01.05.678", "SOMEONE opens the door."]),
        t.join([LSMDC_A, "00.01.02.345", "00.01.05.678", "00.01.02.345", "00.01.05.678", "He looks around the room."]),
        t.join([LSMDC_B, "01.11.23.496", "01.11.25.853", "01.11.23.000", "01.11.25.000", "SOMEONE smiles."]),
        t.join([LSMDC_B, "01.11.23.496", "01.11.25.853", "01.11.23.000", "SOMEONE frowns."]),  # 5 fields
    ]) + "\n")
    write(root, "LSMDC16_annos_val.csv", "\n".join([
        # a stray tab after the caption: an empty 7th field, which readers that strip the line drop
        t.join([LSMDC_C, "00.00.01.000", "00.00.03.500", "00.00.00.750", "00.00.03.750", "SOMEONE runs. "]) + "\t",
        t.join(["0009_Gone_00.00.01.000-00.00.02.000", "00.00.01.000", "00.00.02.000",
                "00.00.01.000", "00.00.02.000", "No file."]),
    ]) + "\n")
    write(root, "LSMDC16_challenge_1000_publictect.csv", "\n".join([
        t.join([LSMDC_B, "01:11:23.496", "01.11.25.853", "01.11.23.000", "01.11.25.000", "Bad time."]),
        t.join([LSMDC_B, "01.11.23.496", "01.11.25.853", "01.11.23.000", "01.11.25.000", "SOMEONE nods."]),
    ]) + "\n")
    touch(root, f"0005_Some_Movie/{LSMDC_A}.avi", f"3011_OTHER_FILM/{LSMDC_B}.avi",
          f"elsewhere/{LSMDC_C}.avi")  # not in its folder: found by stem


def write_activitynet(root: Path) -> None:
    train = {
        "v_AAAAAAAAAAA": {"duration": 82.73, "timestamps": [[0.0, 12.4], [10.9, 82.73], [-3.0, 5.0]],
                          "sentences": ["A man stands on a dock holding a rod.",
                                        "  He casts and reels in a fish.", "Before."]},
        "v_BBB-BB_BBBB": {"duration": 30.5, "timestamps": [[2.1, 31.0], [40.0, 45.0], [7.0, 7.0]],
                          "sentences": ["Two kids build a sand castle.", "past the end", "zero length"]},
        "v_CCCCCCCCCCC": {"duration": 10.0, "timestamps": [[1.0, 2.0]], "sentences": ["no file"]},
        "v_DDDDDDDDDDD": {"duration": 10.0, "timestamps": [[1.0, 2.0]], "sentences": ["not in ids"]},
    }
    val_1 = {"v_EEEEEEEEEEE": {"duration": 10.0, "timestamps": [[1, 2], [3, 9.5]],
                               "sentences": ["a boy jumps.", "  he lands."]}}
    val_2 = {"v_EEEEEEEEEEE": {"duration": 10.0, "timestamps": [[0, 1]], "sentences": ["unused"]}}
    for name, obj in {"train.json": train, "val_1.json": val_1, "val_2.json": val_2,
                      "train_ids.json": ["v_AAAAAAAAAAA", "v_BBB-BB_BBBB", "v_CCCCCCCCCCC",
                                         "v_AAAAAAAAAAA", "v_ZZZZZZZZZZZ"],
                      "val_ids.json": ["v_EEEEEEEEEEE"], "test_ids.json": ["v_FFFFFFFFFFF"]}.items():
        write(root, f"captions/{name}", json.dumps(obj))
    touch(root, "videos/AAAAAAAAAAA.mp4", "videos/v_BBB-BB_BBBB.mkv", "videos/DDDDDDDDDDD.mp4",
          "videos/val/EEEEEEEEEEE.mp4")


DIDEMO_V1 = "12345678@N00_2468013579_ab12cd34ef.mov"


def write_didemo(root: Path) -> None:
    def item(aid, desc, video, times, n=6):
        return {"annotation_id": aid, "description": desc, "video": video, "times": times,
                "num_segments": n, "dl_link": "https://www.flickr.com/video_download.gne?id=1"}

    train = [
        item(101, "the dog jumps into the lake", DIDEMO_V1, [[2, 3], [2, 2], [3, 3], [2, 3]]),
        item(102, "a man waves at the camera ", DIDEMO_V1, [[0, 0], [0, 0], [0, 1], [0, 0]]),
        item(103, "five annotators", "v2_x_y.avi", [[1, 1], [1, 2], [2, 2], [1, 1], [0, 1]]),
        item(104, "seven annotators\n", "v3_bare.", [[4, 5], [5, 5], [5, 5], [4, 5], [5, 5], [5, 5], [3, 5]]),
        item(105, "short video", "v4_short.mp4", [[4, 5], [4, 5], [4, 5], [4, 5]], n=5),
        item(106, "   ", "v4_short.mp4", [[0, 0]] * 4),  # empty description: rejected
        item(107, "gone", "missing.mov", [[0, 0]] * 4),  # no file
    ]
    val = [item(201, "val desc", "vv.mov", [[0, 0]] * 4)]
    test = [item(301, "test desc", "tv.avi", [[1, 1]] * 4),
            item(302, "not in the test list", "unlisted.avi", [[1, 1]] * 4)]
    for name, obj in {"train_data.json": train, "val_data.json": val, "test_data.json": test}.items():
        write(root, f"data/{name}", json.dumps(obj))
    write(root, "data/test_list.txt", "tv\n")
    # v2 as the AWS script saves it (name + .mp4); v3 keeps its bare trailing dot
    touch(root, f"videos/{DIDEMO_V1}", "videos/v2_x_y.avi.mp4", "videos/v3_bare.", "videos/v4_short.mp4",
          "videos/vv.mov", "videos/tv.avi", "videos/unlisted.avi")


def write_youcook2(root: Path) -> None:
    db = {"database": {
        "AAAAAAAAAAA": {"duration": 241.6, "subset": "validation", "recipe_type": "212",
                        "video_url": "https://www.youtube.com/watch?v=AAAAAAAAAAA",
                        "annotations": [{"segment": [25, 37], "id": 0, "sentence": "cut the onion in half and dice"},
                                        {"segment": [37, 50], "id": 1, "sentence": "peel and chop the carrots"}]},
        "BBBBBBBBBBB": {"duration": 60.0, "subset": "training", "recipe_type": "101",
                        "video_url": "https://www.youtube.com/watch?v=BBBBBBBBBBB",
                        "annotations": [{"segment": [50, 70], "id": 0, "sentence": "stir the sauce"},
                                        {"segment": [5, 5], "id": 1, "sentence": "empty span"},
                                        {"segment": [1, 4], "id": 2, "sentence": "  "}]},
        "CCCCCCCCCCC": {"duration": 30.0, "subset": "training", "recipe_type": "101",
                        "video_url": "https://www.youtube.com/watch?v=CCCCCCCCCCC",
                        "annotations": [{"segment": [0, 5], "id": 0, "sentence": "no file"}]},
    }}
    write(root, "annotations/youcookii_annotations_trainval.json", json.dumps(db))
    touch(root, "raw_videos/validation/212/AAAAAAAAAAA.mp4", "raw_videos/training/101/BBBBBBBBBBB.webm")


HOWTO_CAPTIONS = {
    "AAAAAAAAAAA": {"start": [0.41, 3.92, 5.91], "end": [3.91, 5.9, 10.25],
                    "text": ["pick the ripe berries", "pick the ripe berries into a bowl", "into a bowl tonight"]},
    "BBB-BB_BBBB": {"start": [68.46000000000001, 70.0, 72.0], "end": [70.0, 69.0, 75.5],
                    "text": ["wash them, then dry", "end before start", "  "]},
    "CCCCCCCCCCC": {"start": [1.0], "end": [2.0], "text": ["no video file"]},
    "DDDDDDDDDDD": {"start": [1.0, 2.5], "end": [2.5, 4.0], "text": ["first", "second"]},
}


def write_howto100m(root: Path, form: str = "json") -> None:
    if form == "json":
        write(root, "raw_caption.json", json.dumps(HOWTO_CAPTIONS))
    else:
        import csv

        for vid, c in HOWTO_CAPTIONS.items():
            p = root / "small_train_captions" / f"{vid}.csv"
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["start", "end", "text"])
                w.writerows(zip(c["start"], c["end"], c["text"]))
    write(root, "val_list.csv", "video_path\nDDDDDDDDDDD.mp4\n")
    touch(root, "videos/AAAAAAAAAAA.mp4", "videos/BBB-BB_BBBB.webm", "videos/DDDDDDDDDDD.mkv")
