"""parallelnn advise: estimate memory and step time of every parallel layout, here or on other hardware."""
