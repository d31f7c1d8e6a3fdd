"""brand-relay: an SMTP relay that rewraps every message in the brand's layout."""

__version__ = "0.1.0"
