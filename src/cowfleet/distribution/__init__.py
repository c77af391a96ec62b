"""Getting an image to many nodes: which node fetches from which (:mod:`.assign`)."""
