"""Hook management: which modules are watched, and the capture functions that reduce what they see."""
