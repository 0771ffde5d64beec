"""People without labels: every face of a prediction table grouped into people.

How (numbers in benchmarks/README.md, "people"):

1. kNN graph (``pipeline.knn``): each face's K nearest faces by cosine, Ray tasks.
2. Keep an edge when its cosine is at least ``THRESHOLD``.  The threshold comes from
   this backbone's own verification statistics, never from the archive: on the LFW
   pairs (600 same, 600 different, ``../shared/data/pairs``) the cosines are
   same ~ N(0.949, 0.020) and different ~ N(0.833, 0.037); the two likelihoods are equal
   at cos 0.905 (dlib's 0.6 Euclidean rule is cos 0.912 here: raw descriptors have norm
   1.43, not 1) and ``THRESHOLD`` is where "same" is ``EDGE_ODDS`` = 100× likelier than
   "different", cos 0.939.  An equal-odds edge is right per pair but, with every face
   offering K candidates, enough wrong ones chain people together (1 component for
   1,846 LFW faces at 0.91); at 100:1 the graph's wrong edges are few and isolated.
3. Connected components of that graph, then Infomap (igraph) inside each component to cut
   the remaining bridges between two people.  Components are independent, so they are
   clustered in Ray tasks, batches of components per task.

A person's centre is the normalised mean of its faces; ``similarity`` is the cosine to it.
Person ids (``p000001``…) are given largest first and never change on ``--resume``.
"""
from __future__ import annotations

from pipeline.people.clustering import BATCH_NODES, centres, cluster, cluster_graph, components
from pipeline.people.graph import (DIFF_COS, EDGE_ODDS, K, SAME_COS, THRESHOLD, graph_edges, log_likelihood_ratio,
                                   odds_threshold)
from pipeline.people.ids import person_numbers, person_strings, previous_numbers, ranked_ids
from pipeline.people.index import FaceIndex, list_people
from pipeline.people.job import BACKBONE, MIN_LINK_PX, PeopleSummary, cluster_table
from pipeline.people.output import PEOPLE_SCHEMA, ROWS_PER_FILE, write_table, write_text
from pipeline.people.reading import Faces, PeopleError, parquet_files, read_faces, read_people
from pipeline.people.sheet import contact_sheet

__all__ = ["BACKBONE", "BATCH_NODES", "DIFF_COS", "EDGE_ODDS", "K", "MIN_LINK_PX", "PEOPLE_SCHEMA", "ROWS_PER_FILE",
           "SAME_COS", "THRESHOLD", "FaceIndex", "Faces", "PeopleError", "PeopleSummary", "centres", "cluster",
           "cluster_graph", "cluster_table", "components", "contact_sheet", "graph_edges", "list_people",
           "log_likelihood_ratio", "odds_threshold", "parquet_files", "person_numbers", "person_strings",
           "previous_numbers", "ranked_ids", "read_faces", "read_people", "write_table", "write_text"]
