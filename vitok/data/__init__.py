"""Data layer: video I/O (video_io), tfds clip builders (builders, folders,
moving_digits) and grain pipelines (pipeline).

Import the submodules directly (`from vitok.data import pipeline`); this
package file stays empty so importing `vitok` does not pull in tfds / grain.
"""
