"""Rendering of results: figures (PNG), the HTML report page, Markdown summaries."""
