"""Entry point when the app folder itself is run (``python deploy/lidc_app``), as a MAP runs it."""

from app import LidcNoduleApp

if __name__ == "__main__":
    LidcNoduleApp().run()
