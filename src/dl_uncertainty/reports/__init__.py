"""The reports layer: HTML/Markdown rendering, figures, the data report, the evaluation and sweep reports."""
