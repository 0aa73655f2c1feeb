"""sip plane of the silent-monitoring gateway."""
