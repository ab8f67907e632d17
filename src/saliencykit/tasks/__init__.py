"""What is explained beyond a class label, each with its subject and its targets:
CLIP image-text models (`clip`: `Text` prompts, Grad-ECLIP), object detectors (`detection`:
`Box`, `Detector`, D-RISE) and embedding models (`similarity`: `Similarity`)."""
