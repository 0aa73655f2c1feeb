"""idp plane of the silent-monitoring gateway."""
