"""What can be pruned and how: coupled channel groups (structures), masks, physical surgery, counts, exactness."""
