"""An adapter's files: the upload validator, the upload itself, and the zip a download streams."""
