set terminal pngcairo noenhanced size 900,1150
set output 'timeline-1x.png'
set multiplot layout 5,1
set key outside right
set xlabel 'time (s)'
set ylabel 'req/s'
set title 'none at 1x capacity'
plot 'timeline-1x-none.dat' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', '' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'
set title 'max_outstanding at 1x capacity'
plot 'timeline-1x-max_outstanding.dat' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', '' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'
set title 'token_bucket at 1x capacity'
plot 'timeline-1x-token_bucket.dat' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', '' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'
set title 'queue_threshold at 1x capacity'
plot 'timeline-1x-queue_threshold.dat' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', '' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'
set title 'burst at 1x capacity'
plot 'timeline-1x-burst.dat' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', '' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'
unset multiplot
