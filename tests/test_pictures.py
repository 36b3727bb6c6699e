"""space/pictures.py: pictures reach the cache whole, even when visitors write the same one at once."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
from PIL import Image

from space.pictures import cached


def noisy_picture(seed: int, size=(96, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_the_same_picture_gets_the_same_path_and_another_one_another(tmp_path):
    first, again = cached(noisy_picture(0), tmp_path), cached(noisy_picture(0), tmp_path)
    other = cached(noisy_picture(1), tmp_path)
    assert first == again != other
    with Image.open(first) as opened:
        assert opened.format == "WEBP" and opened.size == (96, 64)
    with open(first, "rb") as file:  # named by Gradio's seeded hash: not computable from the picture alone
        assert hashlib.sha256(file.read()).hexdigest() not in first
    assert not [path for path in tmp_path.rglob(".picture-*")], "a staging file was left behind"


def test_an_array_is_stored_like_the_same_image(tmp_path):
    picture = noisy_picture(2)
    assert cached(np.asarray(picture), tmp_path) == cached(picture, tmp_path)


def test_a_reader_never_sees_a_partial_file_while_others_rewrite_it(tmp_path):
    """The failure this module exists for: one visitor downloads a picture while another visitor's
    request writes the same picture again. Every read must return the whole file."""
    picture = noisy_picture(3, size=(320, 320))
    path = cached(picture, tmp_path)
    with open(path, "rb") as file:
        whole = file.read()
    rewrites, reads, read_between, short_reads = [0], [0], set(), []
    lock, stop = threading.Lock(), threading.Event()

    def writer():
        while not stop.is_set():
            cached(picture, tmp_path)
            with lock:
                rewrites[0] += 1

    def reader():
        # Reads go on while the picture is rewritten, until there were reads between enough successive rewrites:
        # each read notes how many rewrites had ended before it (a count, not a time).
        while not stop.is_set():
            with open(path, "rb") as file:
                data = file.read()
            reads[0] += 1
            read_between.add(rewrites[0])
            if data != whole:
                short_reads.append(len(data))
            if len(read_between) > REWRITES_READ_BETWEEN:
                stop.set()

    threads = [threading.Thread(target=writer) for _ in range(2)] + [threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)  # the reader ends them once it has read between enough rewrites
    stop.set()
    assert not any(thread.is_alive() for thread in threads)
    assert not short_reads, f"{len(short_reads)} of {reads[0]} reads saw a partial file: {short_reads[:5]}"
    assert not [p for p in tmp_path.rglob(".picture-*")], "a staging file was left behind"


REWRITES_READ_BETWEEN = 30
"""Rewrites with reads between them before the check ends (about 1 s of rewriting on a quiet machine; a file written
in place is seen partial by about one read in ten)."""
