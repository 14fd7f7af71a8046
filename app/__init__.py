"""The web page (Gradio): ``main`` lays it out, ``handlers`` answers its events over the Python API, ``training``
reads the Add a task tab, ``inputs`` checks every field, ``wording`` speaks errors in the page's terms, ``tables``
formats results."""
