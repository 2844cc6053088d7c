"""Dataset definitions: class names, prompt templates, splits, download and layout info."""
