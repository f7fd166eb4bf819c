"""The seed's story: the training job that shows the symptom, its remedies, and the demo."""
