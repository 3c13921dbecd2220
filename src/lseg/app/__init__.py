"""Interactive applications (the gradio web demo). Import `lseg.app.demo` for `predict` and `build_app`."""
