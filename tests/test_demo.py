"""tools/demo.py --quick runs end to end: data, untrained eval, training, eval, picture, metrics json."""
import json
import math
import os
import subprocess
import sys

import cv2

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_quick_end_to_end(tmp_path):
    work = tmp_path / 'demo'
    res = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, 'tools', 'demo.py'), '--quick', '--work-dir', str(work)],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]

    # the synthetic data went into the work dir, in the COCO layout
    data = work / 'data' / 'synthetic_coco'
    assert len(os.listdir(data / 'train2017')) == 8 and len(os.listdir(data / 'val2017')) == 4
    assert (data / 'annotations' / 'instances_val2017.json').exists()

    with open(work / 'demo_metrics.json') as f:
        summary = json.load(f)
    assert summary['quick'] is True
    assert summary['iterations'] == 4
    assert summary['backbone'] == 'Swin'
    assert summary['num_val_images'] == 4
    for stage in ('untrained', 'trained'):
        for key in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50'):
            value = summary[stage][key]
            assert not math.isnan(value) and 0.0 <= value <= 1.0, (stage, key, value)
    assert summary['seconds']['train'] > 0 and summary['seconds']['wall'] >= summary['seconds']['train']

    # the picture: header, one row per val image (ground truth | untrained | trained), footer
    assert summary['picture'] == str(work / 'predictions.png')
    img = cv2.imread(summary['picture'])
    assert img is not None
    panel = 2 * summary['image_size']
    assert img.shape == (28 + 4 * (panel + 6) + 24, 3 * panel + 12, 3)
    assert img.std() > 20  # an actual picture, not a blank canvas

    # the printed summary reports the numbers that went into the json
    assert 'bbox mAP' in res.stdout and 'mask mAP' in res.stdout
    assert f'{summary["trained"]["bbox_mAP"]:10.3f}' in res.stdout
    assert 'evaluating the UNTRAINED model' in res.stdout
