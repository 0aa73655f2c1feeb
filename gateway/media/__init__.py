"""media plane of the silent-monitoring gateway."""
