"""On-device runtime: DICOM ingest, preprocessing, inference, explanations, outbox, screen."""
