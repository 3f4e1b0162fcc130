"""The face stage, as in the paper: dlib detection and 68-point landmarks, alignment, a Segment Anything mask
(or the landmark hull), white background, content-addressed cache; and the stage as a tracked step.

Owns: `settings` (`FaceSettings`, reason codes, the settings sidecar; light), `detect` (dlib detection, alignment,
hull or SAM prompt, the finished crop), `pipeline` (a manifest's photos on a process pool, SAM batched; the crop
cache), `extractor` (the thread-safe single-photo extractor serving uses), `sam` (SAM on the device), `run` (the
tracked step and its audit: the only module here that imports `cushing.tracking`). May import `cushing.data` and
`cushing.config`; dlib and segment_anything are imported where they are used.
"""
