"""Vehicle-side telematics agent."""

__version__ = "0.1.0"
