"""Drawing detection results for a look by eye: ground truth, untrained and trained predictions of a few
images side by side in one PNG (``tools/demo.py``'s picture). OpenCV only."""
import json
import os.path as osp

import cv2
import numpy as np

__all__ = ['draw_predictions']

COLOURS = [(60, 20, 220), (255, 128, 0), (20, 200, 20), (0, 215, 255), (200, 0, 200)]  # BGR


def _put_label(canvas, text, x, y, colour):
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    x = int(np.clip(x, 0, canvas.shape[1] - tw - 2))
    y = int(np.clip(y, th + 2, canvas.shape[0] - 2))
    cv2.rectangle(canvas, (x, y - th - 2), (x + tw + 2, y + base - 1), colour, -1)
    cv2.putText(canvas, text, (x + 1, y - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)


def _draw_instances(image, boxes, labels, masks, texts, scale, fill=True):
    """Draw masks (filled, or as outlines with ``fill=False``), boxes and labels on an upscaled copy of
    ``image`` (BGR uint8)."""
    h, w = image.shape[:2]
    size = (w * scale, h * scale)
    canvas = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST).astype(np.float32)
    outlines = []
    for mask, label in zip(masks, labels):
        colour = np.array(COLOURS[label % len(COLOURS)], np.float32)
        big = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        if fill:
            canvas[big > 0] = 0.5 * canvas[big > 0] + 0.5 * colour
        contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outlines.append((contours, tuple(int(c) for c in colour)))
    canvas = canvas.astype(np.uint8)
    for contours, colour in outlines:
        cv2.drawContours(canvas, contours, -1, colour, 1 if fill else 2, cv2.LINE_AA)
    for box, label, text in zip(boxes, labels, texts):
        colour = COLOURS[label % len(COLOURS)]
        x0, y0, x1, y1 = (np.asarray(box) * scale).round().astype(int)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, 1)
        _put_label(canvas, text, x0, y0 - 1, colour)
    return canvas


def _gt_for_image(coco_doc, img_path):
    """Ground-truth boxes (xyxy), labels (0-based) and polygon masks of one image of a COCO json."""
    name = osp.basename(img_path)
    image = next(im for im in coco_doc['images'] if im['file_name'] == name)
    cat_index = {c['id']: i for i, c in enumerate(coco_doc['categories'])}
    boxes, labels, masks = [], [], []
    for ann in coco_doc['annotations']:
        if ann['image_id'] != image['id']:
            continue
        x, y, w, h = ann['bbox']
        boxes.append([x, y, x + w, y + h])
        labels.append(cat_index[ann['category_id']])
        mask = np.zeros((image['height'], image['width']), np.uint8)
        for poly in ann['segmentation']:
            pts = np.round((np.asarray(poly).reshape(-1, 2) - 0.5) * 16).astype(np.int32)
            cv2.fillPoly(mask, [pts], 1, shift=4)
        masks.append(mask > 0)
    return boxes, labels, masks


def draw_predictions(path, ann_file, classes, untrained, trained, score_thr, max_drawn=8, scale=2):
    """Write the picture: one row per image, columns ground truth | untrained | trained.

    Args:
        path: PNG to write.
        ann_file: COCO json with the ground truth.
        classes: Class names.
        untrained: Predictions of the untrained model (from :func:`predict`).
        trained: Predictions of the trained model, same keys.
        score_thr: Predictions below this score are not drawn.
        max_drawn: At most this many (the highest-scoring) predictions are drawn per image.
        scale: Upscaling of the small images, for legibility.
    """
    with open(ann_file) as f:
        doc = json.load(f)
    rows = []
    for i in sorted(trained):
        image = cv2.imread(trained[i]['img_path'])
        boxes, labels, masks = _gt_for_image(doc, trained[i]['img_path'])
        panels = [_draw_instances(image, boxes, labels, masks, [classes[c] for c in labels], scale, fill=False)]
        for pred in (untrained.get(i), trained[i]):
            if pred is None:
                panels.append(np.zeros_like(panels[0]))
                continue
            order = np.argsort(-pred['scores'], kind='stable')[:max_drawn]
            keep = order[pred['scores'][order] >= score_thr]
            texts = [f'{classes[c]} {s:.2f}' for c, s in zip(pred['labels'][keep], pred['scores'][keep])]
            panels.append(_draw_instances(image, pred['bboxes'][keep], pred['labels'][keep],
                                          pred['masks'][keep], texts, scale))
        sep = np.full((panels[0].shape[0], 6, 3), 255, np.uint8)
        rows.append(np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=1))
    width = rows[0].shape[1]
    panel_w = (width - 12) // 3
    header = np.full((28, width, 3), 255, np.uint8)
    titles = ('ground truth', 'untrained model', 'trained model')
    for k, title in enumerate(titles):
        cv2.putText(header, title, (k * (panel_w + 6) + 8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1,
                    cv2.LINE_AA)
    hsep = np.full((6, width, 3), 255, np.uint8)
    parts = [header]
    for row in rows:
        parts += [row, hsep]
    footer = np.full((24, width, 3), 255, np.uint8)
    cv2.putText(footer, f'predictions: the top {max_drawn} with score >= {score_thr:.2f}; colour = class', (8, 16),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    parts.append(footer)
    cv2.imwrite(path, np.concatenate(parts, axis=0))
